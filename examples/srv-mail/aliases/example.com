# Aliases of example.com, in Exim lsearch format ("localpart: destination, ...").
#
# example.com has no passwd file, so it has no mailboxes of its own: it is a local
# domain only because this aliases file exists (a domain with a passwd file OR an
# aliases file is a local domain). Every address in it must be an alias, a global
# alias (exim/conf/global_aliases) or caught by a "*" key; there is no "*" here, so
# anything else@example.com is refused.
#
# Keys are matched case-insensitively. Lines starting with # are comments (only at
# the start of a line); blank lines are allowed.

hello: alice@example.org
