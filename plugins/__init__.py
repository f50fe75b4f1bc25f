"""storprobe's built-in format plugins, one module per format (or family).

Each module implements the ``storprobe_formats`` hook and is registered exactly
as a third-party plugin is (see ``storprobe.registry``)."""
