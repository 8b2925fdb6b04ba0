"""TorchServe interoperability: run real TorchServe, and speak its handler contract.

* :mod:`torchship.torchserve.config` writes ``config.properties``;
* :mod:`torchship.torchserve.process` starts, waits for, inspects and stops a real
  TorchServe (Java) with several models (``torchship torchserve start|stop|status``);
* :mod:`torchship.torchserve.contract` is TorchServe's handler contract (``Context``,
  entry points, output encoding) as torchship runs it natively, without Java;
* :mod:`torchship.torchserve.handlers` holds the handlers shipped inside archives.

TorchServe itself (``pip install 'torchship[torchserve]'``, Java 17) is needed only by
the process control; nothing here imports it at import time.
"""
