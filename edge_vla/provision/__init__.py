"""Provisioning robot computers: package, sign, install, doctor."""
