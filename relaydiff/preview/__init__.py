"""DiffusionX-style editing: device previews per round, host refinement of the final one (issue 18).

- :mod:`relaydiff.preview.session`: the editing session API and the contact sheet;
- :mod:`relaydiff.preview.predictor`: the refine/reuse strength predictors (ridge, saved as JSON);
- :mod:`relaydiff.preview.edits`: editing sessions from the world grammar;
- :mod:`relaydiff.preview.train` / :mod:`relaydiff.preview.evaluate`: ``preview train`` and ``eval preview``.
"""
