"""Host adapters: the only code in this project that imports a WebUI's modules."""
