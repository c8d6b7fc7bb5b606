from .crown import backward_bound, crown_bounds
from .ibp import ibp_bounds

__all__ = ["backward_bound", "crown_bounds", "ibp_bounds"]
