-- Nothing of the extension is usable by PUBLIC: the control functions are SECURITY DEFINER and
-- check who calls them, the tables hold connection strings. A DBA grants what an operator role
-- needs (see README, "Privileges").
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA cube_dispatcher FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cube_dispatcher.mask_password(text), cube_dispatcher.shown_options(jsonb, boolean),
    cube_dispatcher.options(), cube_dispatcher.import_ini(text) TO PUBLIC;
REVOKE ALL ON cube_dispatcher.status FROM PUBLIC;
