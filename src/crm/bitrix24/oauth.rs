//! OAuth tokens of a Bitrix24 local application. (Interface; the implementation follows.)
