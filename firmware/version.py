"""The firmware's version: status messages, diag, package.json and manifest.py carry it."""

VERSION = "0.1.0"
