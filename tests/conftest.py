"""
What the unit tests share: the log events published while a test runs.
"""

import pytest
from twisted.logger import globalLogPublisher


@pytest.fixture
def logged():
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)
