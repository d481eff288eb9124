"""Model references and loaders: name sources (hub ids, local directories, open_clip tags,
plugin prefixes), devices and dtypes, and loading offline."""
