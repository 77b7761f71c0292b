"""Ray: connect, place one worker per candidate, collect outcomes as they finish."""
