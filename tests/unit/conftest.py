# The domains fixture the usb_attach, usb_detach and passthrough role tests share.
pytest_plugins = ["tests.unit.passthrough_support"]
