"""Model code shared by the plugins: encoders, attention heads, norm handling,
the streaming engine. One home, no copies per plugin."""
