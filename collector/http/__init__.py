"""HTTP: the API server and its routes, access control and the /metrics exposition."""
