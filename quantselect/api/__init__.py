"""REST edge: FastAPI routes over the service layer."""
