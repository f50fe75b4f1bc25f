"""storprobe's RelaxNG schemas for the XML it emits (installed as storprobe_schemas)."""
