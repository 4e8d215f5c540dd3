//! #[pg_test]s: run inside a real backend by `cargo pgrx test`, each in a transaction that is
//! rolled back afterwards.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn quote_ident_is_postgres_own() {
        use crate::apply::quote_ident;
        assert_eq!(quote_ident("orders"), "orders");
        assert_eq!(quote_ident("Orders"), "\"Orders\"");
        assert_eq!(quote_ident("order"), "\"order\"", "keywords are quoted");
        assert_eq!(quote_ident("x\"; drop table t; --"), "\"x\"\"; drop table t; --\"");
    }
}
