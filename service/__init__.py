"""AdaPruner's search service: HTTP API, job tables, workers. Built on the ``adapruner`` library."""
