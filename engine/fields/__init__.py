"""Neural field components."""
