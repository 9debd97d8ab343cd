"""Networks in plain torch and the store that owns every pretrained file."""
