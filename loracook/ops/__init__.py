"""Pure math on tensors: no paths, no config objects, no logging."""
