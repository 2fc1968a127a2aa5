"""tether: preference optimization that stays tethered."""
__version__ = "0.1.0"
