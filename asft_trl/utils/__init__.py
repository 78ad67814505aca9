"""Small helpers every layer may use (model and dataset sources checked before loading); they import nothing else
from this package."""
