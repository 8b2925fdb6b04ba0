"""What each ``torchship serve --workers N`` uvicorn worker imports: the FastAPI app
factory, with the garbage collector paused while torch, ONNX Runtime and the web stack
import and the models load. ``InferenceService.start`` freezes what is alive and resumes
it (see :mod:`torchship._startup`); the CLI does the same for a single-process server.
"""

from torchship._startup import pause_gc

pause_gc()

from torchship.serving.fastapi_app import app_from_env  # noqa: E402

__all__ = ["app_from_env"]
