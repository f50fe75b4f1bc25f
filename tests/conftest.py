import os

# Tests see only the built-in formats unless a test registers its own plugin.
os.environ.setdefault("STORPROBE_DISABLE_PLUGIN_AUTOLOAD", "1")
