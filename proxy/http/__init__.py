"""The HTTP face of the proxy: the app factory, its routes, the request contract, errors."""
