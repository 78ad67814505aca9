"""The application: the `asft-trl` command line (`cli`), the training script it launches (`train`, also
`accelerate launch -m asft_trl.scripts.train`), the end-of-run report (`summary`) and `asft-trl eval` (`evaluate`).
Everything else in the package is a library these use; nothing outside `scripts` imports them. (The studies live in the
repository's `studies/`, outside the package.)

The quickstart demo is imported here, once: it registers its model, generated dataset, benchmark and task metric with
the libraries (see `asft_trl/quickstart/__init__.py`), which never name it.
"""

from .. import quickstart  # noqa: F401
