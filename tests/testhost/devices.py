"""The devices of the default topology (topologies/default.yml) by the id kvmhost.usb.usb_facts gives them."""

STICK = "46f4:0001:KING0001"
TWIN_A = "0627:0001:TWIN-A"
TWIN_B = "0627:0001:TWIN-B"
SERIAL_ADAPTER = "0403:6001:FTDI0001"
