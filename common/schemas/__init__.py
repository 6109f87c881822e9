"""Request/response models spoken between services (the retriever is a client of the other three)."""
