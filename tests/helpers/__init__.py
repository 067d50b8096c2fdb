"""Helpers the tests import (fixtures that build models, tmpfs, venvs): not tests themselves."""
