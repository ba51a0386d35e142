# hackboot tiny image: a deliberately small YAML reader for the NoCloud keys the image honours.
#
# There is no Python or YAML library in the tiny image, so this busybox-awk script extracts just
# what the boot script needs and writes it as plain line-based files under `out`:
#
#   mode=meta (meta-data):   out/instance-id   out/local-hostname   out/keys (from public-keys)
#   mode=user (#cloud-config): out/hostname   out/keys   out/users   out/runcmd
#
#   out/keys    "USER:KEY" per line; an empty USER means the image's default user (root)
#   out/users   user names from users[] ("default" is dropped)
#   out/runcmd  shell lines, one runcmd entry each (list entries are shell-quoted and joined)
#
# Supported YAML: block mappings at column 0, block sequences (indented or not), one-line flow
# sequences ([a, "b c"]), plain / 'single' / "double" quoted scalars, comments, and | or >
# block scalars as runcmd entries. Not supported (ignored): anchors/aliases, flow mappings,
# multi-line flow collections or plain scalars, JSON meta-data.

function ltrim(s) { sub(/^[ \t]+/, "", s); return s }
function rtrim(s) { sub(/[ \t\r]+$/, "", s); return s }
function indent_of(s) { match(s, /^ */); return RLENGTH }
function emit(file, text) { print text > (out "/" file) }

# Value of a scalar: strips quotes (handling '' and backslash escapes) or a plain scalar's comment.
function unquote(s,    c, res, i, ch) {
    s = rtrim(ltrim(s))
    c = substr(s, 1, 1)
    if (c == "'") {
        res = ""
        s = substr(s, 2)
        while ((i = index(s, "'")) > 0) {
            if (substr(s, i + 1, 1) != "'")
                return res substr(s, 1, i - 1)
            res = res substr(s, 1, i)
            s = substr(s, i + 2)
        }
        return res s
    }
    if (c == "\"") {
        res = ""
        for (i = 2; i <= length(s); i++) {
            ch = substr(s, i, 1)
            if (ch == "\"")
                return res
            if (ch == "\\") {
                i++
                ch = substr(s, i, 1)
                if (ch == "n") ch = "\n"
                else if (ch == "t") ch = "\t"
                else if (ch == "0") ch = ""
                # \\ \" \/ and anything else: the character itself
            }
            res = res ch
        }
        return res
    }
    if (c == "#")
        return ""
    sub(/[ \t]+#.*$/, "", s)
    return s
}

# Split a one-line flow sequence "[a, 'b', "c"]  # comment" into arr[1..n]; returns n.
function flow_split(s, arr,    n, i, ch, q, cur) {
    s = rtrim(ltrim(s))
    s = substr(s, 2)
    n = 0
    cur = ""
    q = ""
    for (i = 1; i <= length(s); i++) {
        ch = substr(s, i, 1)
        if (q != "") {
            cur = cur ch
            if (q == "\"" && ch == "\\") {
                i++
                cur = cur substr(s, i, 1)
            } else if (ch == q) {
                q = ""
            }
            continue
        }
        if (ch == "'" || ch == "\"") {
            q = ch
            cur = cur ch
        } else if (ch == "," || ch == "]") {
            if (rtrim(ltrim(cur)) != "")
                arr[++n] = unquote(cur)
            cur = ""
            if (ch == "]")
                break
        } else {
            cur = cur ch
        }
    }
    return n
}

# Single-quote for sh: a'b -> 'a'"'"'b'
function shquote(s,    parts, n, i, res) {
    n = split(s, parts, "'")
    res = "'" parts[1]
    for (i = 2; i <= n; i++)
        res = res "'\"'\"'" parts[i]
    return res "'"
}

function mapping_key(s) { sub(/[ \t]*:.*$/, "", s); return unquote(s) }
function mapping_value(s) { sub(/^[^:]*:/, "", s); return ltrim(s) }

# One runcmd entry; a trailing newline (e.g. from "...\n") would only add a blank line.
function emit_cmd(cmd) { sub(/\n+$/, "", cmd); if (cmd != "") emit("runcmd", cmd) }

function add_key(user, key) { if (key != "") emit("keys", user ":" key) }

# --- runcmd ----------------------------------------------------------------------------------
function flush_args(    cmd, i) {
    if (!in_args)
        return
    cmd = ""
    for (i = 1; i <= nargs; i++)
        cmd = cmd (i > 1 ? " " : "") shquote(args[i])
    emit_cmd(cmd)
    in_args = 0
    nargs = 0
}

function end_block() {
    if (!in_block)
        return
    emit_cmd(block_text)
    in_block = 0
}

function runcmd_item(ind, item,    a, n, i, cmd) {
    if (run_ind < 0)
        run_ind = ind
    if (ind > run_ind) {            # "- - arg" list form: further args of the current entry
        if (in_args)
            args[++nargs] = unquote(item)
        return
    }
    flush_args()
    if (item ~ /^\[/) {
        n = flow_split(item, a)
        cmd = ""
        for (i = 1; i <= n; i++)
            cmd = cmd (i > 1 ? " " : "") shquote(a[i])
        emit_cmd(cmd)
    } else if (item ~ /^[|>]/) {
        in_block = 1
        block_ind = ind
        block_fold = (substr(item, 1, 1) == ">")
        block_body = -1
        block_text = ""
    } else if (item ~ /^-( |$)/) {
        in_args = 1
        nargs = 0
        item = ltrim(substr(item, 2))
        if (item != "")
            args[++nargs] = unquote(item)
    } else {
        emit_cmd(unquote(item))
    }
}

# --- users -----------------------------------------------------------------------------------
function finish_user(    i) {
    if (!in_user)
        return
    if (user_name != "" && user_name != "default") {
        emit("users", user_name)
        for (i = 1; i <= user_nkeys; i++)
            add_key(user_name, user_keys[i])
    }
    in_user = 0
    user_name = ""
    user_nkeys = 0
    user_sub = ""
}

function user_field(s,    k, v, a, n, i) {
    k = mapping_key(s)
    v = mapping_value(s)
    user_sub = ""
    if (k == "name") {
        user_name = unquote(v)
    } else if (k == "ssh_authorized_keys" || k == "ssh-authorized-keys") {
        if (v ~ /^\[/) {
            n = flow_split(v, a)
            for (i = 1; i <= n; i++)
                user_keys[++user_nkeys] = a[i]
        } else if (v == "" || v ~ /^#/) {
            user_sub = "keys"
        }
    }
}

function users_item(ind, item) {
    if (users_ind < 0)
        users_ind = ind
    if (ind > users_ind) {          # a "- key" line inside the current user's mapping
        if (in_user && user_sub == "keys")
            user_keys[++user_nkeys] = unquote(item)
        return
    }
    finish_user()
    in_user = 1
    if (item ~ /^[A-Za-z0-9_"'-]+[ \t]*:([ \t]|$)/)
        user_field(item)            # "- name: bob"
    else if (item != "")
        user_name = unquote(item)   # "- bob" (or "- default")
}

# --- top-level keys with an inline value -------------------------------------------------------
function inline_value(key, v,    a, n, i) {
    if (mode == "meta") {
        if (key == "instance-id" || key == "instance_id")
            emit("instance-id", unquote(v))
        else if (key == "local-hostname" || key == "hostname")
            emit("local-hostname", unquote(v))
        else if (key == "public-keys" || key == "public_keys") {
            if (v ~ /^\[/) {
                n = flow_split(v, a)
                for (i = 1; i <= n; i++)
                    add_key("", a[i])
            } else {
                add_key("", unquote(v))
            }
        }
        return
    }
    if (key == "hostname") {
        emit("hostname", unquote(v))
    } else if (key == "ssh_authorized_keys" && v ~ /^\[/) {
        n = flow_split(v, a)
        for (i = 1; i <= n; i++)
            add_key("", a[i])
    } else if (key == "runcmd" && v ~ /^\[/) {
        n = flow_split(v, a)
        for (i = 1; i <= n; i++)
            emit_cmd(a[i])
    } else if (key == "users" && v ~ /^\[/) {
        n = flow_split(v, a)
        for (i = 1; i <= n; i++)
            if (a[i] != "default")
                emit("users", a[i])
    }
}

BEGIN {
    top = ""
    run_ind = -1
    users_ind = -1
}

{
    line = $0
    sub(/\r$/, "", line)
    ind = indent_of(line)
    t = substr(line, ind + 1)

    if (in_block) {                 # body of a "- |" runcmd entry: every deeper or blank line
        if (t == "" || ind > block_ind) {
            if (t != "" && block_body < 0)
                block_body = ind
            chunk = (t == "") ? "" : substr(line, block_body + 1)
            if (block_text == "")
                block_text = chunk
            else
                block_text = block_text (block_fold ? " " : "\n") chunk
            next
        }
        end_block()
    }

    if (t == "" || t ~ /^#/ || t ~ /^(---|\.\.\.)([ \t]|$)/)
        next

    if (ind == 0 && t ~ /^[A-Za-z0-9_"'-]+[ \t]*:([ \t]|$)/) {
        flush_args()
        finish_user()
        top = mapping_key(t)
        run_ind = -1
        users_ind = -1
        v = mapping_value(t)
        if (v != "" && v !~ /^#/)
            inline_value(top, v)
        next
    }

    if (t ~ /^-([ \t]|$)/) {
        item = ltrim(substr(t, 2))
        if (mode == "meta") {
            if (top == "public-keys" || top == "public_keys")
                add_key("", unquote(item))
        } else if (top == "runcmd") {
            runcmd_item(ind, item)
        } else if (top == "ssh_authorized_keys") {
            add_key("", unquote(item))
        } else if (top == "users") {
            users_item(ind, item)
        }
        next
    }

    if (mode == "user" && top == "users" && in_user && ind > users_ind && t ~ /^[A-Za-z0-9_"'-]+[ \t]*:([ \t]|$)/)
        user_field(t)
}

END {
    end_block()
    flush_args()
    finish_user()
}
