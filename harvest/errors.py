"""Errors that mean "your input is wrong": reported in one line, without a traceback."""
from .cache_layout import CacheMismatch
from .config import HarvestConfigError
from .chunk_writer import HarvestWriteError
from .documents import DataError
from .model import ModelLoadError
from .packing import CorpusTooSmall
from .run import DiskSpaceError
from .sites import SiteError
from .store import ObjectStoreError

USER_ERRORS = (CacheMismatch, HarvestWriteError, DataError, ModelLoadError, CorpusTooSmall,
               DiskSpaceError, SiteError, HarvestConfigError, ObjectStoreError)
