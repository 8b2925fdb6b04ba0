"""Handlers written against TorchServe's handler contract, shipped inside ``.mar`` files.

``digits_image.py`` (images) and ``tensor.py`` (JSON / ``.npy`` tensors) are copied
into the archives ``torchship archive`` builds. They run unchanged in TorchServe and in
torchship. They import ``torch``, Pillow and ``torchship`` (for exactly the
preprocessing and top-k postprocessing the rest of torchship uses), never TorchServe's
``ts`` package: inside TorchServe they need ``torchship`` installed in the Python that
runs ``torchserve`` (``pip install 'torchship[torchserve]'`` in the same environment).
"""
