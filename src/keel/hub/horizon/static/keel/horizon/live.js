/*
 * Keel: Horizon's ajax-update rows refreshed by the hub's events instead of by polling.
 *
 * One EventSource per page (only on pages with ajax-update rows) to the project's stream,
 * whose URL the plugin's view signs. For each event, the rows whose data-object-id is the
 * event's subject are refreshed by horizon.datatables.update itself, with only those rows
 * selected: the same row_update request, the same replacement (progress bar, checkbox, 404
 * removal, tablesorter and quicksearch caches). A gap event (the hub dropped part of the
 * stream) refreshes every ajax-update row once.
 *
 * Polling: while the stream is open, Horizon's scheduled horizon.datatables.update calls
 * are skipped (they would only fetch what the stream already reports); while it is down
 * they run as they always did, at ajax_poll_interval with Horizon's back-off.
 *
 * State for tests and operators: window.keelLive = {state: "off" | "connecting" | "open" |
 * "down", events: N, refreshed: N}, mirrored in <html data-keel-live="...">.
 */
(function () {
  'use strict';

  if (typeof horizon === 'undefined' || !horizon.datatables || window.keelLive) { return; }

  var status = window.keelLive = {state: 'off', events: 0, refreshed: 0};
  var poll = horizon.datatables.update;   // Horizon's own row-update path
  var refreshing = false;
  var retryDelay = 5000;

  function setState(state) {
    status.state = state;
    document.documentElement.setAttribute('data-keel-live', state);
  }

  horizon.datatables.update = function () {
    if (status.state === 'open' && !refreshing) { return; }  // a scheduled poll: skipped
    return poll.apply(this, arguments);
  };

  function refresh($rows) {
    if (!$rows.length) { return; }
    // Horizon refreshes every 'tr.warning.ajax-update' row: select exactly ours for one call.
    var $others = $('tr.ajax-update').not($rows);
    var $marked = $rows.not('.warning');
    $others.removeClass('ajax-update');
    $marked.addClass('warning');
    refreshing = true;
    try {
      poll.call(horizon.datatables);
    } finally {
      refreshing = false;
      $others.addClass('ajax-update');
    }
    status.refreshed += $rows.length;
    // A row Horizon did not replace (its content had not changed) loses our mark again.
    $(document).one('ajaxStop', function () {
      $marked.filter(function () { return document.body.contains(this); }).removeClass('warning');
    });
  }

  function rowsFor(id) {
    return $('tr.ajax-update').filter(function () {
      return this.getAttribute('data-object-id') === id;
    });
  }

  function onEvent(message) {
    var event;
    try { event = JSON.parse(message.data); } catch (e) { return; }
    status.events += 1;
    if (event && typeof event.subject === 'string') { refresh(rowsFor(event.subject)); }
  }

  function connect() {
    setState('connecting');
    $.ajax({url: WEBROOT + 'project/keel_live/stream/', dataType: 'json', global: false})
      .done(function (answer) {
        if (!answer || !answer.stream || !window.EventSource) { return down(); }
        var source = new EventSource(answer.stream);
        source.addEventListener('open', function () {
          retryDelay = 5000;
          setState('open');
          // What changed before the stream listened (since the page was rendered, or while
          // it was down): once, the rows Horizon would have polled.
          refresh($('tr.warning.ajax-update'));
        });
        source.addEventListener('cloudevent', onEvent);
        source.addEventListener('gap', function () { refresh($('tr.ajax-update')); });
        source.addEventListener('error', function () {
          if (source.readyState === EventSource.CLOSED) {
            down();  // refused (an expired URL, say): ask for a new one later
          } else if (status.state === 'open') {
            setState('down');  // the browser reconnects by itself, resuming after the last id
            poll.call(horizon.datatables);
          }
        });
      })
      .fail(down);
  }

  function down() {
    var wasOpen = status.state === 'open';
    setState('down');
    if (wasOpen) { poll.call(horizon.datatables); }  // resume Horizon's polling meanwhile
    setTimeout(connect, retryDelay);
    retryDelay = Math.min(retryDelay * 2, 60000);
  }

  $(function () {
    if ($('tr.ajax-update').length) { connect(); }
  });
}());
