"""Training data: every common SFT and preference format, detected with a reason, validated, linted.

    from lowvram.data import load_sft_data, load_preference_data
    data = load_preference_data(recipe.dpo.data, recipe.sample_file(recipe.dpo.data), base_dir=recipe_path.parent)

`lowvram data check PATH` runs the same reading and validation without training, plus warnings about
what makes poor preference pairs (see lowvram.data.check). Heavy libraries load only when needed.
"""

from lowvram.data.formats import DATA_FORMATS, KINDS, PREFERENCE_FORMATS, SFT_FORMATS
from lowvram.data.load import LoadedData, load_preference_data, load_sft_data
from lowvram.data.sources import Location, Problem

__all__ = [
    "DATA_FORMATS",
    "KINDS",
    "PREFERENCE_FORMATS",
    "SFT_FORMATS",
    "LoadedData",
    "Location",
    "Problem",
    "load_preference_data",
    "load_sft_data",
]
