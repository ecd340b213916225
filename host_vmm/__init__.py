"""The untrusted host VMM.  It talks to the platform only through the host-port client."""
