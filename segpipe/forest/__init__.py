"""Random-forest pixel classifiers: trained from sparse scribbles on the feature bank
(`segpipe.features`), stored as plain arrays, applied block by block by a compiled
traversal of the trees.

- `model`: the forest as node arrays with its features, catalogue and card, saved to
  and loaded from an ``.npz`` that holds no pickle;
- `predict`: the numba traversal (scikit-learn's predictions, bit for bit);
- `scribbles`: brush strokes drawn on a ground truth (synthetic training data, tests);
- `train`: scikit-learn's ``RandomForestClassifier`` fitted on scribbled pixels, with
  out-of-bag and held-out scores in its model card.
"""

from __future__ import annotations

__all__: list[str] = []
