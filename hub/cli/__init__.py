"""`hubctl`: the hub's command line, an HTTP client of the REST API (main,
client, progress) plus `hubctl serve` (serve), which runs the whole hub on one
machine. Only `serve` touches Django, and only `pull --compressed` the tensor
library, each lazily inside its own command."""
