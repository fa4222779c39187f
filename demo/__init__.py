"""The built-in demo set: generated, served on 127.0.0.1 and downloaded like any url list, so everything runs
offline."""
