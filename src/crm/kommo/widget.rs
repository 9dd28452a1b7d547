//! The pbxgate widget's requests: the `X-Auth-Token` Kommo gives a widget. (Interface; the
//! implementation follows.)
