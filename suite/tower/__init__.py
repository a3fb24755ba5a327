"""The model under test: a timm trunk wrapped like open_clip's TimmModel, its static plan, weights."""
