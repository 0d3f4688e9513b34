"""The delivery-confirming log pipeline, its sinks, its two formats and the ``logging`` check.

Every record of the process goes through one queue to one writer thread
that writes each batch to every sink and reports, per tagged record, what
each sink did with it.
"""
