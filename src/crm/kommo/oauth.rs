//! OAuth tokens of a Kommo integration. (Interface; the implementation follows.)
