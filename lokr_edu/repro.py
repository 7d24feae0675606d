"""One call at the top of every notebook makes its outputs reproducible.

Seeds Python, NumPy and torch, fixes torch's thread count (reduction order, hence the last
digits of a float, can depend on it), shortens printed floats, and fixes matplotlib's figure
size and resolution so committed outputs stay the same from run to run.

Every notebook runs on one thread: the committed outputs are made that way, and it is each
test worker's share of the cores when the tests run one worker per core, so two notebooks
executed side by side never fight over a core.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from lokr_edu.checks.common import brief_blank_exercises
from lokr_edu.sd15 import hide_known_harmless_notices

__all__ = ["quiet_libraries", "setup_notebook"]


def setup_notebook(seed: int = 0, threads: int = 1, precision: int = 4) -> None:
    """Seed every generator, fix the thread count, round printing, fix figure sizes; and hide
    transformers' one known-harmless notice (`lokr_edu.sd15.hide_known_harmless_notices`), which
    would otherwise print on stderr when a chapter first loads a Stable Diffusion pipeline; and
    in a notebook, show a blank exercise as one line (`checks.common.brief_blank_exercises`)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_printoptions(precision=precision, sci_mode=False)
    np.set_printoptions(precision=precision, suppress=True)
    import matplotlib

    matplotlib.rcParams.update({"figure.figsize": (6.4, 4.0), "figure.dpi": 80})
    hide_known_harmless_notices()
    brief_blank_exercises()  # a blank exercise reads as one line in the notebook


def quiet_libraries() -> None:
    """Silence diffusers' and transformers' progress bars and warnings (loading a pipeline prints
    several to stderr), so a notebook's outputs hold only what its cells print."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for logging in (diffusers_logging, transformers_logging):
        logging.set_verbosity_error()
        logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module="accelerate")
