"""Sub-commands of `dove-vlm`; each module defines `register(subparsers)` and sets `handler`."""
