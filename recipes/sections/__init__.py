"""One pydantic model per recipe section; each stage owns the file named after it."""
