"""Integrations of pyfastrl ops into other libraries (model patching lives here, never in ops)."""
