"""omnijet: OmniJet-alpha re-implementation."""
