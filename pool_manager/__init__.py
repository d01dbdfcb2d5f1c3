"""The pool manager: the control plane that owns every model's state and worker."""
