"""Models on the bus: the safetensors layout of a state_dict (``serde``), a model as a stream's source
(``sources``) and sink (``sinks``, ``spool``), fresh receive buffers (``buffers``) and the finite scan of
arriving bytes (``finite``). This layer knows torch; ``fedbus.transport`` below it moves bytes only, through
the ``Source`` and ``Sink`` protocols of ``fedbus.transport.byteio`` that these classes implement."""
