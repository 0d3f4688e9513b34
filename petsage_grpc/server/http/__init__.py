"""The HTTP side: one optional listener (``--http-address``) on the server's event loop.

``listener`` speaks HTTP/1.1 through h11 and bounds what a client may hold;
``routes`` answers from the same health model as gRPC; ``openapi`` documents
the routes.  Imported only when the listener is asked for.
"""
