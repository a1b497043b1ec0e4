"""attnzoo: efficient attention for PyTorch, one API over the efficient-attention literature."""

from . import conventions, nn
from . import methods as _methods  # noqa: F401  (registers every method)
from ._version import __version__
from .api import Explanation, attention, explain
from .cache import Cache
from .decode import DecodeState, init_state, state_size, step
from .errors import NoBackendError
from .inputs import AttentionCall
from .kernels.blocklayout import BlockLayout
from .kernels.lse import merge_attention_states
from .registry import AttentionOutput, Backend, Capabilities, Method, Paper, get_method, methods, register
from .stats import collect_stats

__all__ = [
    "AttentionCall",
    "AttentionOutput",
    "Backend",
    "BlockLayout",
    "Cache",
    "Capabilities",
    "DecodeState",
    "Explanation",
    "Method",
    "NoBackendError",
    "Paper",
    "__version__",
    "attention",
    "collect_stats",
    "conventions",
    "explain",
    "get_method",
    "init_state",
    "merge_attention_states",
    "methods",
    "nn",
    "register",
    "state_size",
    "step",
]
